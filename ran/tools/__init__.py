"""Measuring and picturing the networks and their training: multiply-adds and step times (`measure`), the
benchmark (`bench`), model summaries (`summary`), the soft-mask pictures a run logs (`mask_monitor`), pictures
(`pictures`) and markdown tables (`markdown`)."""
