"""Kubernetes adapters: the CA state Secret and its watch, Lease leader election, per-replica ACK frontiers,
and the Istio objects (``cacerts``, ``istio-ca-root-cert``, ``trust-bundle``).

Every module talks to the API server through the synchronous ``kubernetes`` client, one call at a time,
each with a timeout (:data:`ca_service.kube.client.REQUEST_TIMEOUT`); async callers run those calls in a
thread (``asyncio.to_thread``) so the event loop never blocks on the network.
"""
