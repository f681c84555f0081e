from slmconvert.cli import main

main()
