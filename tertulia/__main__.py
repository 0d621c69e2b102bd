from tertulia.cli import main

main()
