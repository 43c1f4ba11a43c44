"""Results: the Parquet store (trials/ and curves/, partitioned by sweep) and polars queries."""
