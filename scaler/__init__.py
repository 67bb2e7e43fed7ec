"""The scaler: configuration, the pure policy, actuators and the beat glue."""
