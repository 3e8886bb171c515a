"""Background: records when the handler started, for the 202-to-start figure.

The request body is the sample's id; the start time (time.time(), taken before anything else) goes
into the Redis hash `bench:started` under that id. REDIS_URL is the worker's own.
"""

import os
import time

import redis


def handler(event, context):
    started = time.time()
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        client.hset("bench:started", event["body"], repr(started))
    finally:
        client.close()
    return None
