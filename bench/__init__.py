"""``python -m bench`` (``make bench``): throughput, latency and fan-out of manatee-grpc.

The mms simulator runs in the bench process, the server in a subprocess, and the client load in
further processes, so every number crosses real sockets and process boundaries.
"""
