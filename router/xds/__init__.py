"""Proxyless routing: the router serves xDS so stock gRPC clients route themselves.

See router/README.md, "Proxyless (xDS)". `resources` builds a model's Listener, Cluster and
ClusterLoadAssignment from its route table; `cache` keeps them current from the RouteBook;
`stream` is one ADS stream's state machine; `service` serves it on the router's port;
`bootstrap` writes the JSON a client's GRPC_XDS_BOOTSTRAP names.
"""
