"""DSN-SAAL: deep-supervised VGG16-BN with a self-adaptive auxiliary loss, in JAX/Flax."""
