"""One module per benchmark scenario; each returns a `pointsman.bench.report.ScenarioResult`."""
