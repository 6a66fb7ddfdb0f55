"""The training loop and its wiring: build (Config -> Trainer), run (one rank's whole run), the loop,
evaluation and the non-finite/spike guard."""
