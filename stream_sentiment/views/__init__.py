"""What analysts see: the terminal table (``stream-sentiment top``) and the web alert page, read from Redis."""
