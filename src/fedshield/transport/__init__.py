"""The transport layer: fedshield between organisations.

Above the round loop it carries (:mod:`fedshield.simulation`), below the API
that starts it. It now holds the federation's certificate authority
(:mod:`fedshield.transport.ca`); the gRPC server and site client come with
the network issue.
"""
