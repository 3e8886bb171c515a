"""A background function: answered 202 at once, run by a worker.

Its effect is observable: it writes the request body to
.bgfn/example-output/<request id>.json beside netlify.toml (or to $EXAMPLE_OUTPUT_DIR).

    curl -i -X POST -d '{"report": "weekly"}' -H 'content-type: application/json' \
        http://127.0.0.1:8888/.netlify/functions/report-background
"""

import json
import os
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".bgfn" / "example-output"


def handler(event, context):
    out_dir = Path(os.environ.get("EXAMPLE_OUTPUT_DIR", DEFAULT_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{context.aws_request_id}.json"
    target.write_text(json.dumps({"body": event["body"], "function": context.function_name}))
    print(f"report-background wrote {target}")
    return {"statusCode": 200, "body": str(target)}
