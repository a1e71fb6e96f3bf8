"""quantkit's built-in Russian calibration and evaluation text (installed as ``quantkit.calibration_data``)."""
