"""SPIFFE federation: our bundle endpoint, peer bundle sources and pollers, bundle files on disk.

Adapters around :class:`ca_service.services.trust.TrustStore`: peers feed it, the endpoint and the
file publisher read from it.
"""
