"""imgq workers: load models once, then classify chunks of images from per-model queues."""
