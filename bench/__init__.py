"""peftbench's runner side: suites, models, data, the training loop, measurement and evaluation."""
