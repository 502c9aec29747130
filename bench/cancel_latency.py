"""Cancel latency and the API process's memory under printed lines (issue 14, points 5 and 7).

Starts a real server on loopback (random 2-layer GPT-2, one worker forking a
process per request), then five times: a request that loops for ever and a
quick one queued behind it; DELETE the looping one and time until the quick
one runs and until the looping request process has exited.  Then eight
requests each print 1 MB and are kept; the API process's RSS before and
after shows the lines wait on disk, not in memory.

    PYTHONPATH=$PWD/src:$PWD/tests python bench/cancel_latency.py
"""


from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from seethrough.models import offline  # noqa: E402
from seethrough.remote.server import testing  # noqa: E402
from test_cancel import ENDLESS, gone, looping_process, started  # noqa: E402
from test_server import ALICE, call, follow, make_request, packed, post  # noqa: E402

PRINT_1MB = "for i in range(1000):\n    print('x' * 1000)\n"


def rss_mib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) // 1024


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="gpt2-random-"))
    offline.save_random_gpt2(folder, n_layer=2, n_embd=32, n_head=4, n_positions=128)
    args = ["--threads", "1", "--max-stored-bytes-per-key", "1G", "--max-log-bytes", "4M", "--max-log-lines", "100000"]
    with testing.ServerProcess({"gpt2": str(folder)}, api_keys=[ALICE], args=args) as server:
        worker = server.worker_pids("gpt2")[0]
        to_next, to_gone = [], []
        for _ in range(5):
            looping_id = post(server, packed(make_request(ENDLESS))).json()["id"]
            waiting_id = post(server, packed(make_request())).json()["id"]
            started(server, looping_id)
            looping = looping_process(worker)
            begin = time.monotonic()
            call(server, "DELETE", f"/v1/requests/{looping_id}")
            while call(server, "GET", f"/v1/requests/{waiting_id}").json()["status"] == "queued":
                time.sleep(0.005)
            to_next.append(time.monotonic() - begin)
            while not gone(looping):
                time.sleep(0.005)
            to_gone.append(time.monotonic() - begin)
            follow(server, waiting_id)
            call(server, "DELETE", f"/v1/requests/{waiting_id}")
        print("DELETE -> next request running (s):", [round(x, 3) for x in to_next])
        print("DELETE -> looping request process gone (s):", [round(x, 3) for x in to_gone])
        before = rss_mib(server.process.pid)
        ids = [post(server, packed(make_request(PRINT_1MB))).json()["id"] for _ in range(8)]
        for job_id in ids:
            follow(server, job_id)
        print(f"API RSS {before} MiB before, {rss_mib(server.process.pid)} MiB after 8 requests printing 1 MB each "
              f"(kept: {call(server, 'GET', '/v1/usage').json()['bytes']:,} bytes)")


if __name__ == "__main__":
    main()
