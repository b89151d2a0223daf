"""What every package shares, importing none of them: the decision's domain types, the
call budget, drift statistics, the settings base and process supervision."""
