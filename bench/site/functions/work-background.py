"""Background, 10 ms of (waiting) work: the backpressure burst's job, so one worker drains ~100/s."""

import time


def handler(event, context):
    time.sleep(0.01)
    return None
