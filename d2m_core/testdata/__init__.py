"""Test data the project makes itself: synthetic shards, the fault corpus, pause points for kill tests."""
