"""What executes a model: TensorFlow, or OpenVINO (converted at load), behind one
small interface (:class:`workers.runtimes.base.Backend`)."""
