"""What ftvm shows of itself in a lab pool: the demo (`ftvm demo`) and the benchmarks
(`ftvm bench`). They drive the lab (ftvm/lab) and print with the CLI's tables; nothing
else in ftvm imports them."""
