module ca-service/bench/goref

go 1.22
