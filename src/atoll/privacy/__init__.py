"""Privacy and robustness for federated fine-tuning: protections and the attacks that measure them.

Subpackages work on flat vectors, tensor dicts and small models, independent of the engine that
calls them: ``dp`` (client-level DP-FedAvg, adaptive clipping, accounting, example-level DP-SGD),
``secagg`` (Bonawitz et al.'s secure aggregation), ``robust`` (Byzantine-robust aggregators),
``attacks`` (poisoning, free riding, membership inference, text reconstruction), and
``validation`` (checks every incoming update before it is aggregated).
"""
