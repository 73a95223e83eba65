"""A stand-in instance command for the fleet tests: waits for a spot notice on its IMDS, exits 75.

Usage: python standin.py IMDS_URL. It writes `started` in its working directory first, so tests
can wait for the command (not only the instance) to run.
"""

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

url = sys.argv[1]
token_request = urllib.request.Request(f"{url}/latest/api/token", method="PUT",
                                       headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
token = urllib.request.urlopen(token_request, timeout=5).read().decode()
Path("started").write_text("1")
while True:
    request = urllib.request.Request(f"{url}/latest/meta-data/spot/instance-action",
                                     headers={"X-aws-ec2-metadata-token": token})
    try:
        body = urllib.request.urlopen(request, timeout=5).read().decode()
    except urllib.error.HTTPError:
        time.sleep(0.05)
        continue
    Path("notice.json").write_text(body)
    sys.exit(75)
