"""The files a nightly run is read through, made from the run report (`deployer.history.report`, docs/report.md)
and the history: `report.json` (the report itself, for scripts), `junit.xml` (for CI: `junit`) and
`report.html` (for people, with plots of every latency series: `html`, `series`). `files` writes a set of
them into a folder, each whole or not at all.
"""
