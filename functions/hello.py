"""A plain synchronous function: GET /.netlify/functions/hello?name=Ada"""

from _shared.greeting import greet


def handler(event, context):
    name = event["queryStringParameters"].get("name", "world")
    return {
        "statusCode": 200,
        "headers": {"Content-Type": "text/plain; charset=utf-8"},
        "body": greet(name),
    }
