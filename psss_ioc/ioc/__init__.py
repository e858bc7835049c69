"""The IOC: the PV table, the control layer, the records, autosave, access security."""
