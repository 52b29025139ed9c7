"""The KMS service: one module per resource, operations as plain functions of (context, caller,
params), and the operation table the API dispatches from.

    ctx = Context(store, region, keys=KeyLookup(...), keystores=KeyStores(...), access=...)
    result = OPERATIONS["Encrypt"].handler(ctx, caller, params)

Every operation: authorize (through `ctx.keys`) -> check state and spec -> key store -> result.
Parameters arrive validated against botocore's model (blobs are bytes, required members present);
results are Python values the API layer renders. Errors are types from errors.py.

Modules: context (what operations need), lookup (cached key and alias lookups; find vs
authorized), states (checks before use), paging, operations (the table), and one module per
resource: keys, tags, aliases, encryption, signing, rotation, imports, policies, grants;
scheduled (the scheduler's periodic work).
"""

from .context import Context, Params, Result
from .lookup import KeyLookup
from .operations import OPERATIONS, Op
from .scheduled import run_scheduled_work

__all__ = ["OPERATIONS", "Context", "KeyLookup", "Op", "Params", "Result", "run_scheduled_work"]
