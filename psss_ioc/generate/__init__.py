"""Files generated from the PV table: the db template, the Phoebus screen, the README's tables."""
