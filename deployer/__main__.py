from deployer.cli import console_main

console_main()
