"""PiggyBong Realtime: the WebSocket event server.

The per-delivery path runs compiled when a current build of it exists (realtime/native.py).
"""

from realtime.native import enable

#: What runs of the per-delivery path: "compiled: ..." or "interpreted: <why>".
NATIVE = enable(__path__)
