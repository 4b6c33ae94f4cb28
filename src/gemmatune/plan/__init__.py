"""`gemmatune plan`: the memory a run will take, measured on the meta device before any weights load; and
`gemmatune sweep` (sweep.py), whose design `plan` prints and whose trials and final run are budgeted `train` runs."""
