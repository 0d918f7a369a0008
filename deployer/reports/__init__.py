"""The reports written from a run and the history: the files CI keeps and the page people read in the morning
(`report.html`, deployer.reports.html)."""
