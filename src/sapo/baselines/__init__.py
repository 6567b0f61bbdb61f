"""The methods SAPO is compared with that are not in TRL: SPIN (``sapo.baselines.spin``)."""
