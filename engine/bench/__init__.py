"""`smoothserve bench`: drive a running server with a load and measure what its clients see."""
