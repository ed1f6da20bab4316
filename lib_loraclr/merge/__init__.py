"""LoRACLR: features, statistics, optimisers, the merge engine, its report, request and writer."""
