"""Background and trivial: what the accept and drain figures store and run."""


def handler(event, context):
    return None
