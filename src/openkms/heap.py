"""The garbage collector of a serving process: what it starts with is never scanned again.

A server imports much (botocore's service models, SQLAlchemy, cryptography) and builds more at
start (the operation table, the caches), all of it alive until the process ends. CPython's full
(oldest-generation) collection walks every tracked object, so on a serving process it took 80 ms
each time, and it ran every second or so under load: a pause of the whole event loop that every
request in flight waited out, the top of the latency tail. `freeze_startup()`, called once the
process is ready to serve, collects once and moves every object alive then to the permanent
generation (gc.freeze), which no collection walks; a full collection then walks only what was
made since. The cost is bounded and paid once: a frozen object is still freed when its last
reference goes, but one that later becomes garbage inside a reference cycle is not reclaimed
until the process ends (startup objects are almost all alive until then anyway).
"""

from __future__ import annotations

import gc


def freeze_startup() -> None:
    gc.collect()
    gc.freeze()
