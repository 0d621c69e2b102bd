"""Where conversations live: SQLite under TERTULIA_HOME by default, PostgreSQL for teams."""
