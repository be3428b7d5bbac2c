"""Device layer: contract, ledger, metering and spec loading."""
