"""ichnode models: phantoms, preprocessing, networks, training/evaluation, bundled demo weights."""
