"""`gemmatune plan`: the memory a run will take, measured on the meta device before any weights load."""
