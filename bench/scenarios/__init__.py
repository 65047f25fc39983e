"""One module per benchmark scenario; each returns a `bench.report.ScenarioResult`."""
