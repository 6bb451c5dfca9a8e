"""Source: Kafka in, message validation, dead-lettering."""
