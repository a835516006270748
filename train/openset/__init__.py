"""Open-set training: splits of the classes into known and unknown (splits.py, with the committed split
files in split_files/), the data a split cuts out of a dataset (data.py), and the runs: methods, one run
end to end, plans of many runs, their score rows (runs.py). Used by `train osr` and `train demo789`."""
