"""A folder function with an `async def` handler: GET /.netlify/functions/clock"""

import asyncio
import datetime


async def handler(event, context):
    await asyncio.sleep(0)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return {"statusCode": 200, "headers": {"Content-Type": "text/plain"}, "body": now}
