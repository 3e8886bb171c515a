"""Synchronous and trivial: the body the bare-Flask baseline also returns."""


def handler(event, context):
    return {"statusCode": 200, "headers": {"Content-Type": "text/plain; charset=utf-8"}, "body": "ok"}
