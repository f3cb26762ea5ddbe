module httpsdump/bench/loadclient

go 1.19
