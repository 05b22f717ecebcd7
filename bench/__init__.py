"""``python -m bench`` (``make bench``): throughput, latency and fan-out of manatee-grpc.

The mms simulators run in the bench process, the server and the reference (``bench._minimal``,
a minimal bridge of the same design that the unary targets compare with) in subprocesses, and
the client load in further processes, so every number crosses real sockets and process
boundaries.
"""
