"""Run reporting: the metrics log, plots and the HTML report."""
