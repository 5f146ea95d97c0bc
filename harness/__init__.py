"""What the tests and the benchmarks share: sample images and real `bentoml serve` processes."""
