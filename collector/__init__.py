"""Stream to ClickHouse: consumes request events from Redis and owns the ClickHouse schema."""
